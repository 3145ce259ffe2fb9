"""The development stack behind `make run` and the tests: nothing in the product imports it."""
