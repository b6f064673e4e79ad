"""Offline batch generation: a file of OpenAI Batch requests answered through the serving chain.

``records`` reads and checks the input lines and builds output lines, ``output`` appends them (and
recovers what an earlier, interrupted run wrote), ``chain`` answers one line in-process, ``local`` runs
the lines concurrently on one engine, ``ray_pipeline`` runs them over Ray Data actor pools, and ``job``
ties a run together (``mmrag batch``).
"""
