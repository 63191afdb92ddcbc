"""crashsim: crash-consistency fault injection for storage code."""
__version__ = "0.1.0"
