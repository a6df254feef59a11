"""Code the tests share: reference models with random weights saved in every released layout, the
reference decodes, and the equality check. Test modules import from here, never from each other."""
