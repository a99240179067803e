"""What client, server, privacy and the tools agree on, written once.

Standard library and numpy only; imports nothing else of the project, so that every
area may import it (tests/test_layout.py keeps it so).
"""
