"""Allow ``python -m pfedmoap_cli``."""

from pfedmoap_cli.cli.app import main

if __name__ == "__main__":
    main()
