"""Speculative decoding: proposers guess a few tokens ahead, the target model verifies them
all in one forward pass (see tokenmill/model/rejection.py for the acceptance rule)."""
