"""SpaSemSR's network blocks: attention, ControlNet, encoders, text, position."""
