"""Classical (non-neural) run members: trained by their own command line, written as run folders
that the shared inference code serves like a trained experiment's (``codes/classical/minirocket.py``)."""
