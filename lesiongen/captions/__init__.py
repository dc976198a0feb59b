"""Captions: metadata readers, concept tables, splits, caption text, structured reports, the image analyzer and
the VLM client, and the ``build_captions.py`` stage that turns them into an imagefolder dataset."""
