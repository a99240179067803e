"""Deployment on Flower's own engine: certificates, SuperLink and SuperNode launchers."""
