from lit_mpdit.cli import main

main()
