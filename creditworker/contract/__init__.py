"""The wire contract, pydantic only: what producers import, and nothing of the storage stack.

credits (requests, results, limits), plans, operations (the registry), events, errors, periods.
Import from the module that defines a name: this package hands nothing on.
"""
