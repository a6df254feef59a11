"""Turning library exceptions into the one-line reasons streamdec's errors quote."""


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
