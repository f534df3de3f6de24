"""The fault-injection suite (marker ``faults``)."""
