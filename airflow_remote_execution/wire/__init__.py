"""Wire schemas (pydantic) shared by the plane's routes and the agent's client: the only thing the two
sides import in common besides configuration."""
