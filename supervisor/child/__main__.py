from supervisor.child.main import main

main()
