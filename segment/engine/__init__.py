"""The engine: what training and prediction share — window-by-window inference over whole volumes (MONAI's sliding
window, overlap-tile for valid padding, slab-streamed label maps) and the Lightning module (loss, schedule)."""
