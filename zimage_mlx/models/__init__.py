"""The networks, one file per architectural part."""
