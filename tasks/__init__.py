"""Task configs and the custom task modules they name (`module: tasks....`)."""
