"""GenEval: the official metadata format, detections and the protocol's rules."""
