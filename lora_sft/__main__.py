import sys

from lora_sft.cli.main import main

sys.exit(main())
