"""Models: build from scratch or load pretrained (`build`), pair classifiers (`pairs`), checkpoint files
(`checkpoint`), the one checkpoint loader (`loading`), adapter merging (`merge`)."""
