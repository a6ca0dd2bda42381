from services.animate.server import main

main()
