"""Uploaded files: the on-disk store behind ``/v1/files`` (``store``), the document parsers (``parsers``), and
ingestion through a running server (``remote``). Light to import: pypdf, bs4 and Pillow load when used."""
