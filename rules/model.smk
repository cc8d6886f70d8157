# Model: validate_pipeline gates training. Issue 4.
