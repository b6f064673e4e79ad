"""xRAG: each retrieved document enters the LLM as one token, its retrieval vector projected into the
LLM's input-embedding space (``projector.py``), in the prompt form ``context.py`` defines."""
