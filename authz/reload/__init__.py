"""Live configuration: which keys a reload changes, how a changed file is noticed, the reload itself."""
