"""User entry points: the offline LLM class and the ``kvik`` command."""
