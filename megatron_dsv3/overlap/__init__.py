"""Expert-parallel communication and its overlap: the packed all-to-all dispatcher (dispatch.py),
the FB step's two micro-batches taking turns at their all-to-alls (handover.py), and the
transport with its optional emulated link and clock (link.py)."""
