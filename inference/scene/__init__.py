"""The scene stage: resolution buckets; two portraits or one scene -> one reference image, boxes and masks."""
