"""Plain helpers the tests import (`from support.engine import make_engine`): builders, references,
assertions and the server harness. Fixtures live in the conftest.py of the folder that uses them."""
