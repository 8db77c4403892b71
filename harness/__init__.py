"""Test and demo harness: the replay teacher (stand-in for a frontier API), the demo, child processes."""
