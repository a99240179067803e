"""fedslm: the command-line front door (`fedslm simulate`)."""
