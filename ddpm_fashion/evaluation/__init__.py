"""Sample quality offline: FID, precision/recall and class balance, on a FashionMNIST classifier's or InceptionV3's
features."""
