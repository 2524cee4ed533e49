"""Offline data generators: every data set is built from a seed, on any device."""
