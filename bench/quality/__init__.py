"""The evaluation set and its harness: tag quality (recall, precision) of the embedded model.

- ``dataset``: the photos, their labels (``labels.toml``), the synonyms and the categories
  taken from the rules data;
- ``score``: recall and precision of returned tags, the threshold chosen on the tuning half;
- ``evaluate``: the model tagger per configuration (classifier alone, each stage added, the
  final tagger) over the photos, and the markdown report.

``python -m bench.quality`` prints the report; ``make bench`` runs it as the ``quality``
section (bench/s9_quality.py).
"""
