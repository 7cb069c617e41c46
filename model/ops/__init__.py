"""Low-level operators (selective scan) with interchangeable backends."""
