"""The video layer: reading videos as frames, choosing which frames, and turning them into tensors.

`decode` (PyAV, frame-exact, the list of video extensions and media types), `sampling` (pure functions of a
frame count: the official uniform and dense samplers), `transforms` (plain-torch resize / crop / normalize for
training and evaluation), `folders` (the one walk over a folder of videos that every folder command takes),
`prepare` (`stanvid prepare-videos`: re-encoding for fast decoding) and `pipeline` (decoding in worker processes
under an explicit thread budget).

May import: the shared modules at the top of the package (errors, fileio, locking, distributed, precision).
Nothing here knows about models, checkpoints or datasets.
"""
