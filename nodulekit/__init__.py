"""nodulekit: soft activation mapping (SAM/HESAM) for lung-nodule malignancy in low-dose CT."""

__version__ = "0.1.0"
