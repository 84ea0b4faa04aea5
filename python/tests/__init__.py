"""The test suite: a package, so that one test folder can import another's helpers."""
