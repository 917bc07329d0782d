"""Export trained checkpoints to inference engines (CTranslate2)."""
