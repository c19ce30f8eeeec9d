"""KFP pipelines built from components/: `study` (the whole HistoTransfer study) and `inference`
(an ONNX bundle classifying new slides). Compiled YAML beside them; see pipelines/launch.py."""
