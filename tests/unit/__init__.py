"""In-process tests of keyd's modules: no keyd process is started (a few slow ones run a
second Python process to prove something about processes)."""
