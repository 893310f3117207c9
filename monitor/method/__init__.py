"""The QC method of Galati & Zuluaga (2021): segmentation metrics, assessment, selection, pose,
losses, augmentation, segmenter training and inference, run folders, and the train / assess /
refine workflows with their evaluation."""
