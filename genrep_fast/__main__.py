"""``python -m genrep_fast`` = ``genrep-fast`` (also under torchrun: ``torchrun -m genrep_fast``)."""

from genrep_fast.cli import main

raise SystemExit(main())
