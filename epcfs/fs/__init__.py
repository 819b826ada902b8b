"""The pyfuse3 side: interface-file tables and the Operations that serve them."""
