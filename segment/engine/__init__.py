"""The engine: window-by-window inference over whole volumes, shared by validation during training and by prediction
(MONAI's sliding window, overlap-tile for valid padding, slab-streamed label maps)."""
