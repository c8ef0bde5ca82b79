"""Data: the VOC layout, palette and label PNGs (`voc`), decoding user images
safely (`imageio`), boxes and ground-truth objects (`geometry`), and generated
VOC-layout scenes for tests and the demo (`synthetic`)."""
