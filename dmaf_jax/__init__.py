"""DMAF-Net: brain-tumour (BraTS2020) and cardiac (MyoPS2020) segmentation with imbalanced
missing modalities. This package holds the data path so far: preprocessing, splits,
missing-rate CSVs, synthetic data and Grain pipelines."""
