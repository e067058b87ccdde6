"""Model building blocks shared by every torch model."""
