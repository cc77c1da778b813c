"""Sample quality offline: FID, precision/recall and class balance on features of a FashionMNIST classifier or InceptionV3."""
