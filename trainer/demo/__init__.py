"""`wanforge demo`: a pre-trained tiny Wan learns one new concept from generated clips, on CPU."""
