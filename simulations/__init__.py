"""Running federations on one machine: the simulation engine and scenario files."""
