"""The trainer service: Pilot's Flower ClientApp (one per GPU), training between round events."""
